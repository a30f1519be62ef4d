from mlxc.engine.decode.stops import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = []
    for piece in pieces:
        emit, stopped = matcher.feed(piece)
        out.append(emit)
        if stopped:
            return "".join(out)
    return "".join(out) + matcher.flush()


def test_stop_split_across_pieces_is_cut_and_never_shown():
    shown = []
    matcher = StopMatcher(["END"])
    for piece in ["one two E", "N", "D three"]:
        emit, stopped = matcher.feed(piece)
        shown.append(emit)
        assert "E" not in emit or "END" not in "".join(shown)
        if stopped:
            break
    assert "".join(shown) == "one two "


def test_no_stop_returns_everything():
    assert feed_all(StopMatcher(["zzz"]), ["a", "b", "zz", "c"]) == "abzzc"
    assert feed_all(StopMatcher([]), ["a", "b"]) == "ab"


def test_earliest_of_several_stops_wins():
    assert feed_all(StopMatcher(["\n\n", "B"]), ["xx B yy\n\n"]) == "xx "

"""One look for every `--help`, including typer's own options (--help, --install-completion):
a flag shows no `<bool>` after it, as if it took a value (typer's type column does), and an
environment variable shows once, as `[env: MLXC_X]` (typer writes `[env var: X]`)."""

from __future__ import annotations

from typer import core

ENV_FORM = "[env: {}]"


def install() -> None:
    """Patch typer's help rendering; costs nothing until a help is shown."""
    type_column = getattr(core.TyperOption, "display_type_rich", None)
    if type_column is not None:  # typer >= 0.2x: older ones show no type for a flag

        def no_type_for_flags(self, ctx):
            return None if self.is_flag else type_column(self, ctx)

        core.TyperOption.display_type_rich = no_type_for_flags
    for cls in (core.TyperCommand, core.TyperGroup):
        if not getattr(cls.format_help, "_mlxc", False):
            cls.format_help = _one_env_form(cls.format_help)


def _one_env_form(format_help):
    def format_with_one_env_form(self, ctx, formatter):
        from typer import rich_utils  # only now: it imports most of rich

        rich_utils.ENVVAR_STRING = ENV_FORM
        for param in self.get_params(ctx):
            envvar = getattr(param, "envvar", None)
            # Named in the help text already (escaped: an unescaped [env: ...] is a Rich tag,
            # and vanishes): not twice.
            if isinstance(envvar, str) and "\\" + ENV_FORM.format(envvar) in (param.help or ""):
                param.show_envvar = False
        return format_help(self, ctx, formatter)

    format_with_one_env_form._mlxc = True
    return format_with_one_env_form

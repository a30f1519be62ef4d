from mlxc.cli import main

main()

from mxd.cli import main

main()

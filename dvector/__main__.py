from dvector.cli import main

main()

from layershap.cli import main

main()

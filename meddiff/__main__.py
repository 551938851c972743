from meddiff.cli import main

main()

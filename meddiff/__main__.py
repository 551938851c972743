from meddiff.command import main

main()

from petal.daemon.main import main

main()

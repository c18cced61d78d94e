from bootcache.cli.main import main

main()

from nestlearn.cli.main import main

raise SystemExit(main())

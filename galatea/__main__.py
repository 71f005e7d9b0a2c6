from galatea.cli import main

raise SystemExit(main())

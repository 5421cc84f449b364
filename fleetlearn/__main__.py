from fleetlearn.cli import main

raise SystemExit(main())

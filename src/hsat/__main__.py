from hsat.cli import main

raise SystemExit(main())

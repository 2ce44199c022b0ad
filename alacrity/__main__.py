from alacrity.cli import main

raise SystemExit(main())

from costwarden.cli import main

raise SystemExit(main())

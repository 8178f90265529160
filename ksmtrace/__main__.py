from ksmtrace.cli import main

raise SystemExit(main())

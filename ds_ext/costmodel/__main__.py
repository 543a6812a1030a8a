from .model import main

raise SystemExit(main())

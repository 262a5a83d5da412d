from inference_gateway.cli import main

raise SystemExit(main())

from slam_pretrain.cli import main

raise SystemExit(main())

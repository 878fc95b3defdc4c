import sys

from bevkit.launch import main

sys.exit(main())

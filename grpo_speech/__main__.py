import sys

from grpo_speech.cli import main

sys.exit(main())

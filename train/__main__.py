# The stop handlers come first, before the imports below (seconds of torch, DeepSpeed and timm): a SIGUSR1 or
# SIGTERM during start-up is then a stop request, not death with exit 138/143 and no message.
from train import signals

signals.install()

import sys  # noqa: E402

from train.main import main  # noqa: E402

sys.exit(main())

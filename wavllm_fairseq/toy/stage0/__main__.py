"""``python -m wavllm_fairseq.toy.stage0``: the ``wavllm-toy-pretrain`` command."""
import sys

from . import main

sys.exit(main())

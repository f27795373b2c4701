"""``python -m covidx.cascade --stage1 RUN --stage2 RUN [--lung RUN] --out DIR``: assemble Cascade-SEME.

Calibrates Th_vir (Lv et al. 2021, eq. 1) on stage 1's training split, saves the cascade
(``stage1.keras``, ``stage2.keras``, ``lung.keras``, ``cascade.json``) and optionally exports it.
"""

import sys

from covidx.models.cascade import main

if __name__ == "__main__":
    sys.exit(main())

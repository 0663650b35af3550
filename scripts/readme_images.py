"""The proton CT image at the top of the README: docs/pct-reconstruction.png.

    python scripts/readme_images.py

Reconstructs the small CTP404 case of docs/pct.md section 7 on two local engines and saves
the truth, FBP, DROP and DROP + TV side by side (the widget's screenshot,
docs/cluster-widget.png, is copied from the browser test's). A minute or so on two cores.
"""

from pathlib import Path

import cloudlab
from cloudlab.workloads import pct
from cloudlab.workloads.pct import view

OUT = Path(__file__).resolve().parent.parent / "docs" / "pct-reconstruction.png"

if __name__ == "__main__":
    with cloudlab.Cluster(2) as cluster:
        result = pct.reconstruct(cluster, "small")
    OUT.write_bytes(view.compare(result).data)
    print(f"{OUT}: {pct.summary(result.to_dict())}")

"""Where a package's files sit inside its image, and how its layers say what they hold.

The packager writes these paths and roles (packager/layers.py builds the
layers) and the agent reads them back (a device in native mode fetches only the
model and serving layers, found by their role), so they are defined here once.
"""

from __future__ import annotations

from typing import Final

ROOT: Final = "opt/edgefleet"
MODEL_DIR: Final = f"{ROOT}/model"
PYTHON_DIR: Final = f"{ROOT}/python"
SERVING_FILE: Final = f"{ROOT}/serving.json"

# The layer descriptor annotation naming a layer's role, and the roles.
ROLE: Final = "dev.edgefleet.layer"
DEPS: Final = "deps"
MODEL: Final = "model"
SERVING: Final = "serving"
APP: Final = "edgefleet"  # edgefleet's own serving code, in runnable images

# Index annotations of a package pushed to a hub: its variant of the model version, and the
# build inputs that made it (canonical JSON), which a later build of that variant is
# compared with: the same inputs are the same package, other inputs need another variant.
VARIANT: Final = "dev.edgefleet.variant"
BUILD: Final = "dev.edgefleet.build"

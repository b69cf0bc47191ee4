"""Sync models: specs, torch definitions, weights loading and ONNX export.

Importing this package loads only the specs (no torch); the networks are in
:mod:`engine.models.syncnet_v2` and :mod:`engine.models.syncnet_lite`, the export in
:mod:`engine.models.export`.

Models:

- ``syncnet_v2``: SyncNet v2 (Chung & Zisserman, "Out of time: automated lip sync in the wild",
  ACCV workshops 2016), the network of joonson/syncnet_python, on 224 x 224 BGR face crops.
- ``syncnet_lite``: talkscope's compact model, Light-ASD's encoders (MIT) with trained sync heads,
  shipped in the package (``engine/models/weights/syncnet_lite/``).

Getting the SyncNet v2 weights
------------------------------
talkscope never downloads anything, at import or at run time. The weights file is published by
the Oxford VGG group on their lip-sync software page,
https://www.robots.ox.ac.uk/~vgg/software/lipsync/ ; syncnet_python's ``download_model.sh``
fetches it from::

    http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model

Download it once, then either pass it with ``--weights FILE``, or put it in the models
directory, where it is looked for as ``syncnet_v2.model``::

    mkdir -p ~/.cache/talkscope/models        # or the directory $TALKSCOPE_MODELS names
    cd ~/.cache/talkscope/models
    curl -LO http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model
    git hash-object syncnet_v2.model
    # d714bbf3b30324ced69e3815fc41ae6dc519303c

:func:`default_weights_dir` gives that directory (``$TALKSCOPE_MODELS``, else
``~/.cache/talkscope/models``); :func:`git_blob_sha1` computes the check above in Python, and
:func:`engine.models.syncnet_v2.load_syncnet_v2` loads the file (``check_hash=True`` compares it
with the published one). The file is a state dict of the syncnet_python model (MIT licence,
(c) Joon Son Chung); talkscope does not redistribute it.
"""

from engine.models.spec import (
    BATCH_AXIS,
    MODEL_SPECS,
    SYNCNET_LITE,
    SYNCNET_V2,
    ModelSpec,
    TensorSpec,
    TowerName,
    TowerSpec,
    WeightsSpec,
    WindowSpec,
    default_weights_dir,
    default_weights_path,
    get_spec,
    git_blob_sha1,
    sha256_file,
    verify_weights,
)

__all__ = [
    "BATCH_AXIS",
    "MODEL_SPECS",
    "SYNCNET_LITE",
    "SYNCNET_V2",
    "ModelSpec",
    "TensorSpec",
    "TowerName",
    "TowerSpec",
    "WeightsSpec",
    "WindowSpec",
    "default_weights_dir",
    "default_weights_path",
    "get_spec",
    "git_blob_sha1",
    "sha256_file",
    "verify_weights",
]

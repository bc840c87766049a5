"""The data library that ``train/`` and the tools build on: the shard format and its writer (``shards``), the
train/eval loaders over it (``loader``), JPEG decoding (``decode``) and whole-file replacement (``files``). Nothing
here imports ``train/`` or a tool."""

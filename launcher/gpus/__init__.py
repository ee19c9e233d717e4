"""GPU discovery over NVML: what the planner knows about each card. The only pynvml importer.

    discovery.py   the inventory (`discover()`), honouring CUDA_VISIBLE_DEVICES; `python -m launcher.gpus`
    nvmlprobe.py   raw NVML answers; the one place that calls NVML functions
    cudavisible.py CUDA_VISIBLE_DEVICES applied to an inventory the way the CUDA runtime applies it
    gpuspec.py     a card's performance spec for cards the table does not know
    publish.py     publishing the inventory, with live free memory, into the state store
"""

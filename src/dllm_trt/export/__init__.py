"""`dllm-trt export`: a checkpoint directory in, ONNX graphs with external data and a manifest out.

stage.py              run(ExportOptions) -> ExportResult: the verb
lazy_graph.py         tracing the weightless model (models/skeleton.py) into a graph whose weights are recipes
weights.py            recipes: read, transpose and cast one checkpoint tensor as the graph wants it
writer.py             external-data shards, written tensor by tensor
journal.py            what an interrupted export already finished
onnx_export.py        the traced modules, their inputs, dynamic axes and names
softmax_precision.py  softmax in the dtype PyTorch computes it, where the exporter rounds it first
inspect.py            `dllm-trt inspect`: checksums and a summary of any stage's directory
"""

from dllm_trt.export.stage import ExportOptions, ExportResult, run

__all__ = ["ExportOptions", "ExportResult", "run"]

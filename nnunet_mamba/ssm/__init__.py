"""The shared state-space layer: selective scan, Mamba block, scan orders."""
from .mamba import Mamba, MultiScanMamba, SSMBranch
from .scan_orders import (AXIS_PERMUTATIONS, FORWARD, INTER_SLICE, MICCSS_FLIPS, NAMED_ORDERS,
                          REVERSE, ScanOrder, from_sequence, get_order, memory_format_of,
                          to_sequence)
from .selective_scan import (BACKEND_ENV, MEMORY_ENV, ScanBackendError, backend_status,
                             resolve_backend, selective_scan)

__all__ = [
    "Mamba", "MultiScanMamba", "SSMBranch", "ScanOrder", "to_sequence", "from_sequence",
    "get_order", "memory_format_of", "FORWARD", "REVERSE", "INTER_SLICE", "AXIS_PERMUTATIONS",
    "MICCSS_FLIPS", "NAMED_ORDERS", "selective_scan", "resolve_backend", "backend_status", "ScanBackendError",
    "BACKEND_ENV", "MEMORY_ENV",
]

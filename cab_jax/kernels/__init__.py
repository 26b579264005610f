"""Scan kernels that know no models, configs or mesh axes: the Mamba-1 selective scan and the Mamba-2 (SSD) scan."""

"""M-BEIR data layer: file formats and ids (`mbeir`), validation (`validate`), image decoding (`images`).

Submodules are imported explicitly by callers so that importing the package stays cheap.
"""

"""Data layer: image reading, manifests, the OpenSRH reader and the embedded synthetic cohort.

Every later stage reads only a manifest (`hsat.data.manifest`); images are read with
`hsat.data.srh.read_image`, which picks the conversion from the file itself.
"""

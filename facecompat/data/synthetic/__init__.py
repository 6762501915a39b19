"""Synthetic face data in the real formats, generated from a seed (tests, the quickstart, benchmarks).

    identity.py  the appearance model: Identity (stable per identity), Conditions (one capture), rng_for
    drawing.py   face parts as polygons in face units, projected through the head pose
    render.py    render_face: an identity under conditions -> BGR image + five landmarks
    pool.py      render_parallel: jobs in spawned worker processes, output independent of their number
    spec.py      SyntheticSpec (what to generate) and the per-identity render jobs the workers run
    ijbc.py      the IJB-C-style folder (loose crops, meta files, 1:N CSVs)
    sets.py      the MS1M-style rec, lfw.bin and generate_synthetic, the driver (tools/make_synthetic.py)

The package itself imports nothing: a render worker imports only the torch-free modules it needs.
"""

"""GPU: dA precision of the bf16 SSD kernel on the test case that fails (and neighbours)."""
import json, os, sys
sys.path.insert(0, "tests/kernels")
import torch
import test_ssd as t
from compare import rel
from mambatrain_kernels.ssd import triton as st
out = {}
for idx in (7, 6):
    b, L, h, g, p, n, c, dt, o = t.CASES[idx]
    for chunk in (256, 128, 64):
        inp, seq = t.make_inputs(b, L, h, g, p, n, dt, **o)
        grads, ref = t.reference(inp, seq)
        row = {"ref_dA": ref[2]["A"].tolist()}
        for tf32 in (True, False):
            st.TF32 = tf32
            y, f, gr = t.run(t.ssd_scan, inp, seq, grads, chunk_size=chunk)
            row[f"kernel_tf32{int(tf32)}"] = {k: rel(gr[k], ref[2][k]) for k in gr} | {"dA_vals": gr["A"].tolist()}
        st.TF32 = True
        y, f, gr = t.run(t.ssd_chunked_torch, inp, seq, grads, chunk_size=chunk)
        row["chunked_torch"] = {k: rel(gr[k], ref[2][k]) for k in gr}
        inp32 = {k: (v.float() if v is not None else None) for k, v in inp.items()}
        y, f, gr = t.run(t.ssd_scan, inp32, seq, grads, chunk_size=chunk)
        row["kernel_fp32_inputs"] = {k: rel(gr[k], ref[2][k]) for k in gr}
        out[f"case{idx}_chunk{chunk}"] = row
        print(f"case{idx}_chunk{chunk}", json.dumps(row), flush=True)
json.dump(out, open(os.environ["OUT"] + "/da.json", "w"), indent=1)

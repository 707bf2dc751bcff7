"""GPU: save case 7's inputs and the kernel's gradients, to replay them in the interpreter."""
import os, sys
sys.path.insert(0, "tests/kernels")
import torch
import test_ssd as t
b, L, h, g, p, n, c, dt, o = t.CASES[7]
inp, seq = t.make_inputs(b, L, h, g, p, n, dt, **o)
grads, ref = t.reference(inp, seq)
y, f, gr = t.run(t.ssd_scan, inp, seq, grads, chunk_size=c)
cpu = lambda d: {k: (v.detach().cpu() if v is not None else None) for k, v in d.items()}
torch.save({"inp": cpu(inp), "seq": seq.cpu(), "grads": [x.cpu() for x in grads], "gpu_grads": cpu(gr),
            "ref_grads": cpu(ref[2])}, os.environ["OUT"] + "/case7.pt")
print("saved")

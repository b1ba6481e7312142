"""Post-processing grid on *training* images for a nuclei checkpoint (how the bundled model's np_threshold
0.7 / keep_unmarked False were chosen): ``python bench/tune_postprocess.py CKPT [CKPT ...]``; then
``python bench/tune_postprocess.py --stamp SRC DST NP_THRESHOLD`` writes the choice into the checkpoint."""

if __name__ == "__main__":
    import sys
    if sys.argv[1] == "--stamp":
        sys.argv = sys.argv[1:]
        import json, sys
        from cellvit_optimus.heads.checkpoint import load_nuclei_head, save_nuclei_head
        src, dst, npt = sys.argv[1], sys.argv[2], float(sys.argv[3])
        L = load_nuclei_head(src)
        extra = json.loads(L.metadata["extra"])
        extra["postprocess"] = {"np_threshold": npt, "keep_unmarked": False}
        extra["postprocess_tuning"] = ("grid np_threshold {0.5,0.6,0.7} x marker_threshold {0.3,0.4,0.5} x keep_unmarked "
            "on training images (consep/test_1 every 2nd patch, monuseg TCGA-21-5784 and TCGA-AR-A1AK), mean bPQ of the two sources")
        save_nuclei_head(dst, L.head, profile=L.profile, backbone_id=L.backbone_id, backbone_hash=L.backbone_hash,
                         nuclei_mpp=L.nuclei_mpp, extra=extra)
    else:
        import sys, json, hashlib, itertools, torch
        torch.set_num_threads(2)
        from cellvit_optimus.engine.datasets import load_consep, load_monuseg
        from cellvit_optimus.engine.nuclei import NucleiModel, PostProcessConfig, score_predictions, segment_image
        cons = [s for s in load_consep() if s.group == "consep/test_1"][::2]
        mon = [s for s in load_monuseg() if s.group in ("monuseg/TCGA-21-5784-01Z-00-DX1", "monuseg/TCGA-AR-A1AK-01Z-00-DX1")]
        tr = cons + mon
        for ck in sys.argv[1:]:
            m = NucleiModel(ck)
            cache = {}
            orig = m.predict
            def pred(b, orig=orig, cache=cache):
                k = hashlib.sha1(b.tobytes()).hexdigest()
                if k not in cache: cache[k] = orig(b)
                return cache[k]
            m.predict = pred
            res = []
            for npt, mk, ku in itertools.product((0.5, 0.6, 0.7), (0.3, 0.4, 0.5), (True, False)):
                post = PostProcessConfig(np_threshold=npt, marker_threshold=mk, keep_unmarked=ku)
                ps = [segment_image(s.image, s.mpp, m, post=post) for s in tr]
                r = score_predictions(tr, [p.inst_map for p in ps], [p.types_lut for p in ps], 4)
                cb = score_predictions(cons, [p.inst_map for p in ps[:len(cons)]], None, 4)["bpq"]
                mb = score_predictions(mon, [p.inst_map for p in ps[len(cons):]], None, 4)["bpq"]
                res.append((round((cb + mb) / 2, 4), npt, mk, ku, r["bpq"], r["f1_det"], r["mpq"]))
                print(ck[-20:], res[-1], flush=True)
            print("BEST", ck, sorted(res)[-3:], flush=True)

"""The release half: everything after the gate chose a variant.

One module per concern, one entry per command:

- `packaging.build_bundle` (the package stage): model files, model card, Modelfile,
  `provenance.intoto.json` (`provenance`), `manifest.json` (`manifest`), the signature
  (`signing`);
- `verify.verify` / `verify_gguf` / `verify_behaviour` (`quantbuild verify`);
- `lineage.lineage` (`quantbuild lineage`);
- `releasing.release` / `audit` / `rollback` (`quantbuild release|audit|rollback`), on
  `registry` (GTO versions and stages, DVC objects).
"""

"""Bundle signatures with OpenSSF model-signing, offline, with an elliptic-curve key pair.

The signature (`model.sig`, a Sigstore bundle) covers every file of the bundle, the
manifest included; it is written after the manifest, which names the scheme and the
sha256 of the public key. ECDSA signatures are randomized, so `model.sig` is the one file
of a bundle whose bytes differ between two identical builds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from quantbuild.errors import ConfigError
from quantbuild.hashing import sha256_bytes

SIGNATURE = "model.sig"
SCHEME = "openssf-model-signing/elliptic-key"


def _load_private_key(path: Path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if not path.is_file():
        raise ConfigError(f"package.signing_key={path}: file not found (create a pair with `quantbuild keygen`)")
    try:
        return load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"package.signing_key={path}: not an unencrypted PEM private key ({err})") from None


def public_key_sha256(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return sha256_bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def signing_record(private_key_path: Path) -> dict[str, str]:
    """What the manifest says about the signature, known before signing."""
    return {"scheme": SCHEME, "signature": SIGNATURE,
            "public_key_sha256": public_key_sha256(_load_private_key(private_key_path).public_key())}


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """A new P-256 key pair: PEM private key (mode 0600) and PEM public key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                              PublicFormat)

    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path}: already exists (refusing to overwrite a key)")
    key = ec.generate_private_key(ec.SECP256R1())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def sign_gguf(path: Path, private_key_path: Path) -> None:
    """Sign a GGUF file's digests in its own metadata (deterministic ECDSA, RFC 6979: the
    same file and key give the same bytes), so the file alone proves who released it."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from quantbuild.runtimes.gguf_file import SIGNATURE_KEY, SIGNER_KEY, signed_payload, with_strings

    key = _load_private_key(private_key_path)
    signature = key.sign(signed_payload(path), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    signed = path.with_name(f".{path.name}.signed")
    with_strings(path, signed, {SIGNATURE_KEY: base64.b64encode(signature).decode(),
                                SIGNER_KEY: public_key_sha256(key.public_key())})
    os.replace(signed, path)


def check_gguf_signature(path: Path, public_key_path: Optional[Path]) -> list[str]:
    """Problems with a lone GGUF's signature, one line each: a signed file needs a key to be
    checked with, and an unsigned one cannot pass a check with a key (no downgrade)."""
    import base64

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from quantbuild.runtimes.gguf_file import SIGNATURE_KEY, layout, signed_payload

    signature = layout(path).values.get(SIGNATURE_KEY)
    if signature is None:
        return [] if public_key_path is None else [
            f"{path.name}: not signed, and a public key ({public_key_path}) was given: an unsigned file cannot "
            f"verify against a key"]
    if public_key_path is None:
        return [f"{path.name}: signed, and no public key was given to check it (pass --public-key or set "
                f"package.public_key)"]
    try:
        public_key = load_pem_public_key(public_key_path.read_bytes())
        public_key.verify(base64.b64decode(signature, validate=True), signed_payload(path),
                          ec.ECDSA(hashes.SHA256()))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return [f"{path.name}: its signature does not verify with {public_key_path} (signed by another key, or "
                f"its digests were rewritten)"]
    return []


def _hashing_config():
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=True)


def sign_bundle(bundle: Path, private_key_path: Path) -> None:
    from model_signing import signing

    _load_private_key(private_key_path)
    (signing.Config().set_hashing_config(_hashing_config())
     .use_elliptic_key_signer(private_key=private_key_path).sign(bundle, bundle / SIGNATURE))


def signed_changes(bundle: Path) -> list[str]:
    """How the bundle differs from the files its signature lists, read from the signature's
    payload without trusting it: it explains a failed verification, it never passes one."""
    import base64
    import json

    from quantbuild.hashing import sha256_file

    try:
        envelope = json.loads((bundle / SIGNATURE).read_text(encoding="utf-8"))["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        signed = {entry["name"]: entry["digest"] for entry in statement["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    present = {path.relative_to(bundle).as_posix(): path for path in bundle.rglob("*")
               if path.is_file() and not path.is_symlink() and path.name != SIGNATURE}
    return ([f"{name}: differs from the signed file" for name in sorted(signed)
             if name in present and sha256_file(present[name]) != signed[name]]
            + [f"{name}: signed, and missing" for name in sorted(set(signed) - set(present))]
            + [f"{name}: not signed" for name in sorted(set(present) - set(signed))])


def check_signature(bundle: Path, record: dict, public_key_path: Path | None,
                    details: list[str] | None = None, named: bool = True) -> list[str]:
    """Problems with the bundle's signature (empty when it verifies with `public_key_path`),
    one short line each; the signature library's whole message is appended to `details`.
    A key the user did not name (`named` false: the project's own) that is not the signer's
    says the signer is unknown here rather than calling the bundle forged."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from model_signing import verifying

    if record.get("scheme") != SCHEME:
        return [f"manifest: unknown signing scheme {record.get('scheme')!r} (this quantbuild reads {SCHEME})"]
    if not (bundle / SIGNATURE).is_file():
        return [f"{SIGNATURE}: missing (the manifest says the bundle is signed)"]
    if public_key_path is None:
        return [f"{SIGNATURE}: the bundle is signed, and no public key was given to check it "
                f"(pass --public-key or set package.public_key)"]
    if not public_key_path.is_file():
        return [f"{public_key_path}: public key file not found"]
    try:
        public_key = load_pem_public_key(public_key_path.read_bytes())
    except ValueError as err:
        return [f"{public_key_path}: not a PEM public key ({err})"]
    problems = []
    if not named and public_key_sha256(public_key) != record.get("public_key_sha256"):
        return [f"{SIGNATURE}: signed by a key this project does not hold (public key sha256 "
                f"{str(record.get('public_key_sha256'))[:16]}...): check it with --public-key and the signer's key"]
    if public_key_sha256(public_key) != record.get("public_key_sha256"):
        problems.append(f"{public_key_path}: not the key the manifest names "
                        f"(manifest {record.get('public_key_sha256')}, key {public_key_sha256(public_key)})")
    try:
        (verifying.Config().set_hashing_config(_hashing_config())
         .use_elliptic_key_verifier(public_key=public_key_path).verify(bundle, bundle / SIGNATURE))
    except Exception as err:  # model-signing raises ValueError and crypto errors alike
        if details is not None:
            details.append(f"{SIGNATURE}: {str(err) or type(err).__name__}")
        changes = signed_changes(bundle)
        more = f" (and {len(changes) - 1} more: --json)" if len(changes) > 1 else ""
        problems.append(f"{SIGNATURE}: does not verify with {public_key_path}: " +
                        (f"{changes[0]}{more}" if changes else "signed by another key, or the signature was altered"))
    return problems

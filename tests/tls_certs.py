"""Test PKI made at test time with the openssl CLI (no key is committed).

`Pki(dir)` creates a CA; `pki.leaf(name, dns=[...], uris=[...])` issues an
EC P-256 certificate for server and client use and returns its paths;
`pki.serial(cert_path)` reads a certificate's serial (lower-case hex).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _run(*argv: str, cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass
class Leaf:
    cert: Path
    key: Path

    def serial(self) -> str:
        return serial_of(self.cert.read_bytes())


def serial_of(pem: bytes) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem,
                         capture_output=True, check=True, timeout=10).stdout.decode()
    return out.strip().split("=", 1)[1].lower().lstrip("0") or "0"


def der_serial(der: bytes) -> str:
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"],
                         input=der, capture_output=True, check=True,
                         timeout=10).stdout.decode()
    return out.strip().split("=", 1)[1].lower().lstrip("0") or "0"


class Pki:
    def __init__(self, directory: Path, name: str = "mesh test CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = Leaf(self.dir / "ca.crt", self.dir / "ca.key")
        _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(self.ca.key), "-out", str(self.ca.cert),
             "-subj", f"/CN={name}", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)
        self._n = 0

    def leaf(self, name: str, dns=(), uris=(), days: int = 2, expired: bool = False) -> Leaf:
        self._n += 1
        stem = self.dir / f"{name}-{self._n}"
        key, csr, crt, ext = (stem.with_suffix(s) for s in (".key", ".csr", ".crt", ".ext"))
        sans = [f"DNS:{d}" for d in dns] + [f"URI:{u}" for u in uris]
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
                 "extendedKeyUsage=serverAuth,clientAuth"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
             cwd=self.dir)
        argv = ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.ca.cert),
                "-CAkey", str(self.ca.key), "-set_serial", str(_random_serial()),
                "-out", str(crt), "-extfile", str(ext)]
        # A negative validity (notAfter a day before notBefore) makes an
        # expired certificate with openssl 3.0, which has no -not_after.
        argv += ["-days", "-1" if expired else str(days)]
        _run(*argv, cwd=self.dir)
        return Leaf(crt, key)


def _random_serial() -> int:
    import secrets
    return secrets.randbits(63) | 1

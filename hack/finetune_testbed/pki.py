"""The test bed's certificates and keys, made with openssl in ``<state dir>/pki``.

Three parts, each made when the component that needs it is started:

- the cluster: a CA, the API server's serving cert, the service-account signing key pair;
- the training-operator's webhook: its own CA (the cert rotator wants the DNS name
  ``training-operator-ca``) and a serving cert for ``training-operator.kubeflow.svc`` and 127.0.0.1;
- kwok's kubelet API: a serving cert for 127.0.0.1 from the cluster CA (the API server checks it);
- Kueue's webhooks (``up --kueue``): their own CA (``kueue-ca``, as Kueue's cert rotator checks)
  and a serving cert for ``kueue-webhook-service.kueue-system.svc`` and 127.0.0.1.

Keys are ECDSA P-256 (generated in milliseconds; RSA keys took most of `up --api-only`'s time),
except the webhooks': the training-operator's and Kueue's cert rotators read their CA key as
PKCS#1 RSA.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .log import TestbedError

DAYS = "3650"
APISERVER_SAN = (
    "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
    "DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
)


def cluster_pki(pki: Path) -> None:
    """ca.crt/key, apiserver.crt/key, sa.key/sa.pub."""
    pki.mkdir(parents=True, exist_ok=True)
    _keys(pki, "ca", "apiserver", "sa")
    _ca(pki, "ca", "finetune-testbed-ca")
    _leaf(pki, "apiserver", "ca", "kube-apiserver", APISERVER_SAN)
    _openssl("pkey", "-in", pki / "sa.key", "-pubout", "-out", pki / "sa.pub")


def webhook_pki(pki: Path) -> None:
    """webhook-ca.crt/key and webhook.crt/key for the training-operator's webhook server.

    Its cert rotator keeps an existing Secret only if the CA verifies for the DNS name
    ``training-operator-ca`` and the serving cert for training-operator.kubeflow.svc; 127.0.0.1
    is added so that the API server can call the webhook on loopback.
    """
    _keys(pki, "webhook-ca", "webhook", rsa=True)
    _ca(pki, "webhook-ca", "training-operator-ca", san="DNS:training-operator-ca")
    _leaf(
        pki,
        "webhook",
        "webhook-ca",
        "training-operator.kubeflow.svc",
        "DNS:training-operator.kubeflow.svc,DNS:localhost,IP:127.0.0.1",
    )


def kueue_pki(pki: Path, ca_name: str, service_dns: str) -> None:
    """kueue-ca.crt/key and kueue-webhook.crt/key for Kueue's webhook server.

    Kueue's cert rotator (the same cert-controller as the training-operator's) keeps the Secret
    it finds when the CA verifies for the DNS name ``ca_name`` and the serving cert for
    ``service_dns``; 127.0.0.1 is added so that the API server can call the webhooks on loopback.
    """
    _keys(pki, "kueue-ca", "kueue-webhook", rsa=True)
    _ca(pki, "kueue-ca", ca_name, san=f"DNS:{ca_name}")
    _leaf(pki, "kueue-webhook", "kueue-ca", service_dns, f"DNS:{service_dns},IP:127.0.0.1")


def kwok_pki(pki: Path) -> None:
    """kwok.crt/key: kwok serves the nodes' kubelet API (container logs) on loopback."""
    _keys(pki, "kwok")
    _leaf(pki, "kwok", "ca", "kwok-kubelet", "DNS:localhost,IP:127.0.0.1")


def _keys(pki: Path, *names: str, rsa: bool = False) -> None:
    """Generate the keys in parallel: ECDSA P-256, or RSA 2048 in PKCS#1 form."""
    if rsa:
        algorithm = ["genrsa", "-traditional"]
        tail = ["2048"]
    else:
        algorithm = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        tail = []
    procs = [
        subprocess.Popen(
            ["openssl", *algorithm, "-out", str(pki / f"{n}.key"), *tail],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n in names
    ]
    errors = [(p, p.communicate()[1]) for p in procs]
    for p, err in errors:
        if p.returncode != 0:
            raise TestbedError(f"openssl {algorithm[0]} failed: {err.decode(errors='replace')}")


def _ca(pki: Path, name: str, cn: str, san: str | None = None) -> None:
    args: list[str | Path] = [
        "req", "-x509", "-new", "-key", pki / f"{name}.key", "-days", DAYS,
        "-subj", f"/O=finetune-testbed/CN={cn}", "-out", pki / f"{name}.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
    ]  # fmt: skip
    if san:
        args += ["-addext", f"subjectAltName={san}"]
    _openssl(*args)


def _leaf(pki: Path, name: str, ca: str, cn: str, san: str, usage: str = "serverAuth") -> None:
    ext = pki / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"
    )
    csr = pki / f"{name}.csr"
    _openssl("req", "-new", "-key", pki / f"{name}.key", "-subj", f"/CN={cn}", "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", pki / f"{ca}.crt", "-CAkey", pki / f"{ca}.key",
        "-CAcreateserial", "-days", DAYS, "-extfile", ext, "-out", pki / f"{name}.crt",
    )  # fmt: skip


def _openssl(*args: str | Path) -> None:
    p = subprocess.run(
        ["openssl", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        raise TestbedError(f"openssl {args[0]} failed: {p.stderr.strip()}")

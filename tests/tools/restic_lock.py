#!/usr/bin/env python3
"""Writes a restic lock file with a chosen age into a local repository, as a process on another
host that died long ago would have left it. restic cannot backdate its own locks, and a test of
stale-lock handling needs one older than restic's 30-minute threshold.

    restic_lock.py REPO --host HOST --pid PID --age-minutes M [--exclusive]   (password: $RESTIC_PASSWORD)

It follows restic's repository format: the master key is decrypted from a key file (scrypt,
AES-256-CTR), the lock JSON is encrypted with it (AES-256-CTR, Poly1305-AES MAC over the
ciphertext, key R || AES_K(nonce)), and the file is named by the SHA-256 of its content.
Prints the lock's id.
"""
import argparse
import base64
import datetime
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305


def ctr(key, iv, data):
    c = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return c.update(data) + c.finalize()


def mac(k, r, nonce, data):
    e = Cipher(algorithms.AES(k), modes.ECB()).encryptor()
    s = e.update(nonce) + e.finalize()
    p = Poly1305(r + s)
    p.update(data)
    return p.finalize()


def master_key(repo, password):
    keys = os.path.join(repo, "keys")
    with open(os.path.join(keys, sorted(os.listdir(keys))[0])) as f:
        kf = json.load(f)
    derived = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(kf["salt"]), n=kf["N"], r=kf["r"], p=kf["p"],
        maxmem=1 << 30, dklen=64)
    enc, k, r = derived[:32], derived[32:48], derived[48:64]
    data = base64.b64decode(kf["data"])
    iv, ct, tag = data[:16], data[16:-16], data[-16:]
    if mac(k, r, iv, ct) != tag:
        sys.exit("wrong password for this repository")
    m = json.loads(ctr(enc, iv, ct))
    return (base64.b64decode(m["encrypt"]), base64.b64decode(m["mac"]["k"]),
            base64.b64decode(m["mac"]["r"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("--host", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--age-minutes", type=float, required=True)
    ap.add_argument("--exclusive", action="store_true")
    a = ap.parse_args()
    enc, k, r = master_key(a.repo, os.environ["RESTIC_PASSWORD"])
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=a.age_minutes)
    lock = {"time": when.isoformat().replace("+00:00", "Z"), "exclusive": a.exclusive,
            "hostname": a.host, "username": "root", "pid": a.pid, "uid": 0, "gid": 0}
    iv = os.urandom(16)
    ct = ctr(enc, iv, json.dumps(lock).encode())
    blob = iv + ct + mac(k, r, iv, ct)
    name = hashlib.sha256(blob).hexdigest()
    with open(os.path.join(a.repo, "locks", name), "wb") as f:
        f.write(blob)
    print(name)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Development TLS certificates and SuperNode authentication keys for a Flower deployment.
#
#   bash scripts/deploy/make-certs.sh [NUM_SUPERNODES]      (default 3)
#
# Writes, under $DEPLOY_DIR (default .deploy/ in the checkout, git-ignored):
#   certs/ca.crt, ca.key               a dev certificate authority (keep ca.key private)
#   certs/server.crt, server.key       the SuperLink's certificate, signed by the CA, valid
#                                      for $SUPERLINK_HOSTS (SAN; default localhost,127.0.0.1)
#   keys/supernode-<i>, .pub           SuperNode i's ECDSA P-384 key pair, OpenSSH format:
#                                      the private key stays at site i
#                                      (flower-supernode --auth-supernode-private-key), the
#                                      public key goes to the coordinator
#                                      (flwr supernode register)
#
# This is a DEVELOPMENT CA: for a real consortium, have each site's certificates issued by
# a CA the sites trust and generate each site's key pair on that site's machine.
# Existing files are kept; set FORCE=1 to regenerate everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
NUM_SUPERNODES="${1:-3}"
DEPLOY_DIR="${DEPLOY_DIR:-$PWD/.deploy}"
SUPERLINK_HOSTS="${SUPERLINK_HOSTS:-localhost,127.0.0.1}"
DAYS="${DAYS:-365}"
CERTS="$DEPLOY_DIR/certs"
KEYS="$DEPLOY_DIR/keys"
mkdir -p "$CERTS" "$KEYS"
chmod 700 "$DEPLOY_DIR" "$KEYS"

if [ "${FORCE:-0}" = 1 ]; then
  rm -f "$CERTS"/* "$KEYS"/*
fi

# --- The certificate authority and the SuperLink's certificate ------------------------
if [ ! -s "$CERTS/server.crt" ]; then
  # subjectAltName: modern TLS clients (gRPC, httpx) ignore the CN and check the SAN only.
  san=""
  IFS=',' read -ra hosts <<<"$SUPERLINK_HOSTS"
  for h in "${hosts[@]}"; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
  done
  san="${san%,}"
  openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$DAYS" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" -subj "/CN=flower-llm dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  openssl req -newkey rsa:3072 -nodes -sha256 -keyout "$CERTS/server.key" \
    -out "$CERTS/server.csr" -subj "/CN=${hosts[0]}" 2>/dev/null
  ext="$CERTS/server.ext"
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$san" >"$ext"
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days "$DAYS" -sha256 -extfile "$ext" -out "$CERTS/server.crt" 2>/dev/null
  rm -f "$CERTS/server.csr" "$ext" "$CERTS/ca.srl"
  chmod 600 "$CERTS/ca.key" "$CERTS/server.key"
  openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/server.crt" >/dev/null
  echo "TLS: $CERTS/ca.crt and server.crt (SAN $san)"
fi

# --- SuperNode key pairs ---------------------------------------------------------------
# Flower's node authentication wants an EC key on a NIST curve in OpenSSH format (the
# SuperNode loads it with cryptography's load_ssh_private_key), which openssl cannot write;
# ssh-keygen does, as in Flower's documentation. Without ssh-keygen, Python's cryptography
# (a Flower dependency) writes the same format.
for i in $(seq 0 $((NUM_SUPERNODES - 1))); do
  key="$KEYS/supernode-$i"
  [ -s "$key" ] && [ -s "$key.pub" ] && continue
  rm -f "$key" "$key.pub"
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$key"
  else
    python - "$key" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path = sys.argv[1]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption(),
)
public = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "wb") as fh:
    fh.write(private)
with open(path + ".pub", "wb") as fh:
    fh.write(public + b" supernode-" + path.rsplit("-", 1)[1].encode() + b"\n")
PY
  fi
  echo "SuperNode key pair: $key(.pub)"
done

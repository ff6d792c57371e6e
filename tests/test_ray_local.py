"""Smoke test of the shared local Ray instance: token auth on, Ray Data reading Parquet from the S3 server."""

from __future__ import annotations

import os

import pyarrow as pa

from mel_ray import storage


def test_token_auth_is_on(ray_local):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN

    @ray.remote
    def worker_auth_mode() -> str:
        return os.environ.get("RAY_AUTH_MODE", "")

    assert ray.get(worker_auth_mode.remote()) == "token"


def test_ray_data_reads_parquet_from_s3(ray_local, s3_bucket):
    import ray

    uri = f"{s3_bucket}/tables/numbers.parquet"
    storage.write_table(uri, pa.table({"x": list(range(100)), "y": [str(i) for i in range(100)]}))
    fs, path = storage.resolve(uri)
    ds = ray.data.read_parquet(path, filesystem=fs)
    doubled = ds.map_batches(lambda b: {"x2": b["x"] * 2}, batch_format="numpy")
    assert sorted(r["x2"] for r in doubled.take_all()) == [2 * i for i in range(100)]

    @ray.remote
    def read_in_worker(u: str) -> int:  # workers inherit the S3 environment of the test session
        return storage.read_table(u).num_rows

    assert ray.get(read_in_worker.remote(uri)) == 100

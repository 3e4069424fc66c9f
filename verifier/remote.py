"""A verifier served by another gRPC server that implements nebula.v1.VerifierService."""

from __future__ import annotations

import json

from nebula.config import RemoteVerifierConfig, VerifierServiceConfig
from nebula.v1 import verifier_pb2 as pb
from verifier.api import AsyncVerifier, Outcome, VerifierInputError, VerifyInput


class RemoteVerifier(AsyncVerifier):
    name = "remote"
    version = "remote"
    description = "Calls a verifier on another VerifierService."

    def __init__(self, local_name: str, remote: RemoteVerifierConfig,
                 config: VerifierServiceConfig | None = None) -> None:
        super().__init__(config)
        from nebula.clients.verifier import AsyncVerifierClient  # the channel needs a running loop

        self.local_name = local_name
        self.remote = remote
        self.remote_name = remote.remote_name or local_name
        self._client = AsyncVerifierClient(remote.address, timeout_s=remote.timeout_s)

    async def averify(self, item: VerifyInput, timeout_s: float) -> Outcome:
        msg = pb.VerifyItem(verifier=self.remote_name, response=item.response,
                            reference=item.reference, metadata_json=json.dumps(item.metadata))
        deadline = min(timeout_s, self.remote.timeout_s)
        [res] = await self._client.verify_pb([msg], item_timeout_s=deadline, timeout_s=deadline + 1)
        details = json.loads(res.details_json) if res.details_json else {}
        details["remote"] = {"address": self.remote.address, "verifier": self.remote_name,
                             "version": res.verifier_version}
        if res.status == pb.VerifyResult.STATUS_TIMEOUT:
            raise TimeoutError(res.reason)
        if res.status != pb.VerifyResult.STATUS_OK:
            raise VerifierInputError(f"remote {self.remote.address}: {res.reason}")
        return Outcome(res.reward, res.passed, res.reason, details)

    async def aclose(self) -> None:
        await self._client.close()

"""The functions.file.v1.FileService implementation: unpack, call one use case, build the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

from connectrpc.request import RequestContext
from functions.file.v1 import file_pb2

from app.files import logic
from app.files.model import File, FileStatus
from app.platform.context import require_principal
from app.platform.errors import FieldViolation, InvalidInput
from app.platform.timestamps import timestamp_of

_STATUS_TO_PROTO = {
    FileStatus.PENDING: file_pb2.FILE_STATUS_PENDING,
    FileStatus.PROCESSING: file_pb2.FILE_STATUS_PROCESSING,
    FileStatus.READY: file_pb2.FILE_STATUS_READY,
    FileStatus.FAILED: file_pb2.FILE_STATUS_FAILED,
}
_STATUS_FROM_PROTO = {value: status for status, value in _STATUS_TO_PROTO.items()}


class FileHandler:
    """FileService over the files use cases."""

    def __init__(self, files: logic.Files) -> None:
        self._files = files

    async def create_upload(
        self, request: file_pb2.CreateUploadRequest, ctx: RequestContext, /
    ) -> file_pb2.CreateUploadResponse:
        principal = require_principal()

        file, target = await self._files.create_upload(
            principal, request.name, request.content_type, request.size, request.sha256
        )

        return file_pb2.CreateUploadResponse(
            file=file_to_proto(file),
            upload_url=target.url,
            upload_headers=target.headers,
            upload_expire_time=timestamp_of(target.expire_time),
        )

    async def complete_upload(
        self, request: file_pb2.CompleteUploadRequest, ctx: RequestContext, /
    ) -> file_pb2.CompleteUploadResponse:
        principal = require_principal()

        file = await self._files.complete_upload(principal, request.file_id)

        return file_pb2.CompleteUploadResponse(file=file_to_proto(file))

    async def upload(
        self, request: AsyncIterator[file_pb2.UploadRequest], ctx: RequestContext, /
    ) -> file_pb2.UploadResponse:
        principal = require_principal()
        metadata, chunks = await _split_upload_stream(request)

        file = await self._files.upload(principal, metadata, chunks)

        return file_pb2.UploadResponse(file=file_to_proto(file))

    async def get_file(self, request: file_pb2.GetFileRequest, ctx: RequestContext, /) -> file_pb2.GetFileResponse:
        principal = require_principal()

        file = await self._files.get_file(principal, request.file_id)

        return file_pb2.GetFileResponse(file=file_to_proto(file))

    async def list_files(self, request: file_pb2.ListFilesRequest, ctx: RequestContext, /) -> file_pb2.ListFilesResponse:
        principal = require_principal()
        status = _status_filter(request.status)

        page = await self._files.list_files(principal, request.page_size, request.page_token, request.content_type, status)

        return file_pb2.ListFilesResponse(
            files=[file_to_proto(file) for file in page.files], next_page_token=page.next_page_token
        )

    async def get_download_url(
        self, request: file_pb2.GetDownloadUrlRequest, ctx: RequestContext, /
    ) -> file_pb2.GetDownloadUrlResponse:
        principal = require_principal()
        thumbnail = _is_thumbnail(request.variant)
        inline = _is_inline(request.disposition)

        target = await self._files.get_download_url(principal, request.file_id, thumbnail=thumbnail, inline=inline)

        return file_pb2.GetDownloadUrlResponse(
            url=target.url, expire_time=timestamp_of(target.expire_time), content_type=target.content_type
        )

    async def delete_file(self, request: file_pb2.DeleteFileRequest, ctx: RequestContext, /) -> file_pb2.DeleteFileResponse:
        principal = require_principal()

        await self._files.delete_file(principal, request.file_id)

        return file_pb2.DeleteFileResponse()

    async def rename_file(self, request: file_pb2.RenameFileRequest, ctx: RequestContext, /) -> file_pb2.RenameFileResponse:
        principal = require_principal()

        file = await self._files.rename_file(principal, request.file_id, request.name, request.etag)

        return file_pb2.RenameFileResponse(file=file_to_proto(file))


def file_to_proto(file: File) -> file_pb2.File:
    """Build the File message of a file."""
    return file_pb2.File(
        id=file.id,
        uid=file.uid,
        name=file.name,
        content_type=file.content_type,
        size=file.size,
        sha256=file.sha256,
        status=_STATUS_TO_PROTO[file.status],
        failure_reason=file.failure_reason,
        has_thumbnail=file.has_thumbnail,
        create_time=timestamp_of(file.create_time),
        update_time=timestamp_of(file.update_time),
        upload_expire_time=timestamp_of(file.upload_expire_time),
        etag=file.etag,
    )


async def _split_upload_stream(
    messages: AsyncIterator[file_pb2.UploadRequest],
) -> tuple[logic.UploadMetadata, AsyncIterator[bytes]]:
    """Read the metadata from the first message of an Upload stream; return it and the chunks that follow."""
    first = await anext(aiter(messages), None)
    if first is None or first.WhichOneof("content") != "metadata":
        raise InvalidInput(FieldViolation("metadata", "must be set in the first message of the stream"))
    declared = first.metadata
    metadata = logic.UploadMetadata(
        name=declared.name,
        content_type=declared.content_type,
        size=declared.size if declared.HasField("size") else None,
        sha256=declared.sha256,
    )

    async def chunks() -> AsyncIterator[bytes]:
        async for message in messages:
            if message.WhichOneof("content") == "metadata":
                raise InvalidInput(FieldViolation("metadata", "must be set in the first message only"))
            yield message.chunk

    return metadata, chunks()


def _status_filter(value: int) -> FileStatus | None:
    if value == file_pb2.FILE_STATUS_UNSPECIFIED:
        return None
    if value not in _STATUS_FROM_PROTO:
        raise InvalidInput(FieldViolation("status", f"must be a FileStatus value: got {value}"))
    return _STATUS_FROM_PROTO[value]


def _is_thumbnail(variant: int) -> bool:
    if variant not in (file_pb2.FILE_VARIANT_UNSPECIFIED, file_pb2.FILE_VARIANT_ORIGINAL, file_pb2.FILE_VARIANT_THUMBNAIL):
        raise InvalidInput(FieldViolation("variant", f"must be a FileVariant value: got {variant}"))
    return variant == file_pb2.FILE_VARIANT_THUMBNAIL


def _is_inline(disposition: int) -> bool:
    if disposition not in (file_pb2.DISPOSITION_UNSPECIFIED, file_pb2.DISPOSITION_INLINE, file_pb2.DISPOSITION_ATTACHMENT):
        raise InvalidInput(FieldViolation("disposition", f"must be a Disposition value: got {disposition}"))
    return disposition == file_pb2.DISPOSITION_INLINE
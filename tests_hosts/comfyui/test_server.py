"""The nodes through ComfyUI's HTTP API: `main.py --cpu` on 127.0.0.1, graphs POSTed to /prompt, bounded polling."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

from hosts import PACKAGE, host_source
from test_nodes import export, export_objective

START_S, POLL_S = 180, 0.5
COMFYUI = host_source('comfyui', 'ComfyUI')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def request(url, data=None, timeout=10):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, body, {'Content-Type': 'application/json'} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """ComfyUI serving on 127.0.0.1 with the node package linked into custom_nodes/; stopped afterwards."""
    base = tmp_path_factory.mktemp('comfy')
    (base / 'custom_nodes').mkdir()
    (base / 'custom_nodes' / 'kdiff_align_comfyui').symlink_to(PACKAGE / 'comfyui', target_is_directory=True)
    loras = base / 'models' / 'loras'
    loras.mkdir(parents=True)
    export(loras / 'aligned.safetensors', [0.3, 5.0])
    export_objective(loras / 'mg.safetensors', 'mg')
    export_objective(loras / 'gft.safetensors', 'gft')
    save_file({'x': torch.zeros(1)}, str(loras / 'plain.safetensors'))
    port = free_port()
    log = open(base / 'server.log', 'w')
    proc = subprocess.Popen([sys.executable, 'main.py', '--cpu', '--listen', '127.0.0.1', '--port', str(port),
                             '--base-directory', str(base)], cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f'ComfyUI exited with {proc.returncode}: {(base / "server.log").read_text()[-3000:]}')
            try:
                if request(f'{url}/object_info/KDiffAlignMetadata', timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f'ComfyUI did not answer within {START_S} s: {(base / "server.log").read_text()[-3000:]}')
            time.sleep(POLL_S)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def run_graph(url, graph, tries=120):
    status, body = request(f'{url}/prompt', {'prompt': graph, 'client_id': 'kdiff-align-tests'})
    if status != 200:
        return status, body
    prompt_id = body['prompt_id']
    for _ in range(tries):
        history = request(f'{url}/history/{prompt_id}')[1]
        if prompt_id in history and history[prompt_id]['status'].get('completed') is not None:
            return status, history[prompt_id]
        time.sleep(POLL_S)
    pytest.fail(f'prompt {prompt_id} did not finish within {tries * POLL_S} s')


def test_object_info_lists_the_nodes_and_files(server):
    info = request(f'{server}/object_info')[1]
    assert {'KDiffAlignGuider', 'KDiffAlignCFGPatch', 'KDiffAlignMetadata'} <= set(info)
    assert info['KDiffAlignGuider']['category'] == 'sampling/kdiff_align'
    files = info['KDiffAlignMetadata']['input']['required']['metadata_file'][0]
    assert {'loras/aligned.safetensors', 'loras/plain.safetensors'} <= set(files)


def metadata_graph(name):
    return {'1': {'class_type': 'KDiffAlignMetadata', 'inputs': {'metadata_file': name}},
            '2': {'class_type': 'PreviewAny', 'inputs': {'source': ['1', 2]}},
            '3': {'class_type': 'PreviewAny', 'inputs': {'source': ['1', 1]}}}


def test_graph_reads_the_export(server):
    status, entry = run_graph(server, metadata_graph('loras/aligned.safetensors'))
    assert status == 200 and entry['status']['status_str'] == 'success'
    assert 'recommended w 1.5' in entry['outputs']['2']['text'][0]
    assert float(entry['outputs']['3']['text'][0]) == 2.5  # cfg = 1 + w


def test_graph_errors_name_the_problem(server):
    status, entry = run_graph(server, metadata_graph('loras/plain.safetensors'))
    assert status == 200 and entry['status']['status_str'] == 'error'
    messages = json.dumps(entry['status']['messages'])
    assert 'carries no kdiff_align metadata' in messages
    status, body = run_graph(server, metadata_graph('loras/missing.safetensors'))
    assert status == 400 and 'metadata_file' in json.dumps(body)


def test_graph_reads_one_pass_exports(server):
    status, entry = run_graph(server, metadata_graph('loras/mg.safetensors'))
    assert status == 200 and entry['status']['status_str'] == 'success'
    assert 'in one pass per step (host cfg 1, no unconditional pass)' in entry['outputs']['2']['text'][0]
    assert float(entry['outputs']['3']['text'][0]) == 1.0
    status, entry = run_graph(server, metadata_graph('loras/gft.safetensors'))
    assert status == 200 and entry['status']['status_str'] == 'error'
    assert 'which ComfyUI cannot pass' in json.dumps(entry['status']['messages'])

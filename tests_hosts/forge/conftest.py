"""Forge (../shared/hosts, extracted by `make test-hosts`) imported in-process on the CPU, as webui.py starts it."""

import os
import sys

from hosts import host_source

FORGE = host_source('forge', 'stable-diffusion-webui-forge')
GUESS = host_source('huggingface_guess', 'huggingface_guess')
sys.path.insert(0, str(FORGE))
sys.path.insert(1, str(GUESS))  # Forge imports huggingface_guess as a package (its repositories/ checkout)
sys.argv = ['webui.py', '--always-cpu', '--skip-torch-cuda-test', '--skip-version-check', '--skip-prepare-environment',
            '--no-download-sd-model']
os.chdir(FORGE)  # Forge resolves its folders from the working directory

from modules import initialize  # noqa: E402

initialize.imports()

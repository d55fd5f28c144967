import os
import sys
from pathlib import Path

os.environ.setdefault('K_DIFFUSION_USE_COMPILE', '0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
sys.path.insert(0, str(Path(__file__).resolve().parent))

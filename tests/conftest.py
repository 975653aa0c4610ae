import sys
from pathlib import Path

# tests/tiny.py (tiny random models) is imported by several test modules
sys.path.insert(0, str(Path(__file__).parent))

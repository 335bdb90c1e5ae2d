// Unit tests cover the pure helpers in src/model.ts (no JupyterLab or DOM needed).
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: { include: ['src/__tests__/**/*.test.ts'], environment: 'node' }
});

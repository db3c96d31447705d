// The server's data hint (nbd/server-data-hint.ts): remembers ranges block
// status said hold data, answers "covered" only for requests wholly inside
// one, forgets the oldest first and everything on forget().
import { describe, expect, it } from 'vitest';
import { DataHint, HINT_EXTENTS } from '../../nbd/server-data-hint.js';

describe('DataHint', () => {
  it('covers requests inside a learnt range only', () => {
    const h = new DataHint();
    expect(h.covers(0, 4096)).toBe(false);
    h.learn(65536, 1 << 20);
    expect(h.covers(65536, 4096)).toBe(true);
    expect(h.covers(65536 + (1 << 20) - 4096, 4096)).toBe(true);
    expect(h.covers(65536 + (1 << 20) - 4096, 8192)).toBe(false);
    expect(h.covers(0, 65537)).toBe(false);
    h.learn(0, 0);
    expect(h.covers(0, 1)).toBe(false);
  });

  it('replaces the oldest range and forgets everything on demand', () => {
    const h = new DataHint();
    for (let i = 0; i <= HINT_EXTENTS; i++) h.learn(i * 1000, 10);
    expect(h.covers(0, 10)).toBe(false);
    expect(h.covers(1000, 10)).toBe(true);
    expect(h.covers(HINT_EXTENTS * 1000, 10)).toBe(true);
    h.forget();
    expect(h.covers(1000, 10)).toBe(false);
  });
});
